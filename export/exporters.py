"""One function per artifact: PyTorch Classifier -> ONNX / ExecuTorch (XNNPACK) / Core ML, fp32 and smaller.

Every exporter takes the eval-mode model (normalisation inside, input [1, 3, S, S] float32 in
0..1), the class names and calibration images, writes exactly one artifact into `out_dir` and
returns its manifest entry (without size/sha256, which the caller adds after all steps succeed).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

log = logging.getLogger("export")

INPUT_NAME, OUTPUT_NAME = "image", "logits"


@dataclass
class ExportContext:
    model: torch.nn.Module          # eval mode; [B, 3, S, S] float32 in 0..1 -> [B, C] logits (+ distance column)
    arch: str
    classes: list[str]
    input_size: int
    calib: np.ndarray               # [N, 3, S, S] float32 in 0..1, training images
    out_dir: Path
    metadata: dict[str, str]        # short strings for formats that carry metadata (Core ML, ONNX)

    def example(self, batch: int = 1) -> torch.Tensor:
        return torch.from_numpy(self.calib[:batch]).contiguous()


# ----------------------------------------------------------------------------- ONNX

def export_onnx_fp32(ctx: ExportContext) -> dict:
    import onnx

    path = ctx.out_dir / f"{ctx.arch}_onnx_fp32.onnx"
    batch = torch.export.Dim("batch", min=1, max=1024)
    prog = torch.onnx.export(ctx.model, (ctx.example(2),), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                             dynamo=True, dynamic_shapes=({0: batch},), external_data=False)
    prog.optimize()
    prog.save(str(path))
    m = onnx.load(str(path))
    for k, v in ctx.metadata.items():
        m.metadata_props.add(key=k, value=v)
    onnx.save(m, str(path))
    onnx.checker.check_model(str(path), full_check=True)
    log.info("onnx fp32: checker passed, opset %s", [o.version for o in m.opset_import if o.domain in ("", "ai.onnx")])
    return _entry(path, "onnx", "fp32", "onnxruntime", "dynamic")


class _CalibReader:
    """onnxruntime CalibrationDataReader over real training images, batch 1."""

    def __init__(self, images: np.ndarray):
        self._it = iter(images)

    def get_next(self):
        x = next(self._it, None)
        return None if x is None else {INPUT_NAME: x[None].astype(np.float32)}


# The dynamo ONNX exporter names each node's module path in its "namespace" metadata ("<Type>/<fqn>: <Type>/...").
# What int8 files keep in fp32, by module path in the Classifier (fp32_nodes explains why): its input
# normalisation, the classifier layer, and the feature distance export appends; plus the node that writes the
# graph's output (the concatenation of logits and distance, or the mean over test-time views).
FP32_MODULES = ("norm", "backbone.head.fc", "distance")


def fp32_nodes(onnx_path: Path, modules: tuple[str, ...] = FP32_MODULES, output: bool = True) -> list[str]:
    """Names of the nodes of the Classifier's `modules` (and, with `output`, of the node writing the graph output),
    which int8 files keep in fp32.

    - norm (train.models.InputNorm): small differences of pixel values (a high-pass, a sharpness, a background
      level): at 8 bits od_sharp's unsharp mask measured 5% right instead of 53% (runs/odsharp80, crosslab_dev).
    - backbone.head.fc, distance (train.distance.FeatureDistance) and the output: an int8 file rounded the logits
      and the distance to one 8-bit grid at the output (three of five synthetic clumps got the same distance,
      0.4257, runs/xs48 before session 13), so a picture near the confidence or distance threshold fell on
      either side by rounding. They are one [1, D] row per picture; the backbone, where the compute is, stays int8.
    fp32 costs nothing measurable beside the backbone (benchmarks.latency).
    """
    import onnx

    scopes = [f"/{m}: " for m in modules]
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    outputs = {o.name for o in graph.output} if output else set()
    names = [n.name for n in graph.node
             if any(k.key == "namespace" and any(s in k.value for s in scopes) for k in n.metadata_props)
             or outputs.intersection(n.output)]
    log.info("onnx int8: %d nodes of %s%s kept in fp32", len(names), ", ".join(modules), " and the output" * output)
    return names


def input_norm_nodes(onnx_path: Path) -> list[str]:
    """Names of the nodes of the model's input normalisation (fp32 in int8 files; fp32_nodes)."""
    return fp32_nodes(onnx_path, ("norm",), output=False)


def _outside_fp32_modules(node: "torch.fx.Node") -> bool:
    """PT2E filter: False for the nodes fp32_nodes keeps in fp32 in ONNX int8 (FP32_MODULES, the output's writer)."""
    if any(user.op == "output" for user in node.users):
        return False
    return not any(fqn in FP32_MODULES or fqn.startswith(tuple(m + "." for m in FP32_MODULES))
                   for fqn, _ in node.meta.get("nn_module_stack", {}).values())


def export_onnx_int8(ctx: ExportContext) -> dict:
    """Static QDQ int8 (per-channel weights) calibrated on training images; starts from the fp32 export."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src = ctx.out_dir / f"{ctx.arch}_onnx_fp32.onnx"
    if not src.exists():
        export_onnx_fp32(ctx)
    pre = ctx.out_dir / f".{ctx.arch}_onnx_pre.onnx"
    path = ctx.out_dir / f"{ctx.arch}_onnx_int8.onnx"
    quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
    keep = fp32_nodes(src)  # from the fp32 file: quant_pre_process keeps node names, drops metadata
    quantize_static(str(pre), str(path), _CalibReader(ctx.calib), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.Percentile, nodes_to_exclude=keep,
                    extra_options={"CalibPercentile": 99.99})
    pre.unlink(missing_ok=True)
    log.info("onnx int8: calibrated on %d training images", len(ctx.calib))
    return _entry(path, "onnx", "int8", "onnxruntime", "dynamic")


# ----------------------------------------------------------------------------- ExecuTorch

def _lower_to_pte(ep: "torch.export.ExportedProgram", path: Path) -> None:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    prog = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()]).to_executorch()
    path.write_bytes(prog.buffer)


def export_xnnpack_fp32(ctx: ExportContext) -> dict:
    path = ctx.out_dir / f"{ctx.arch}_xnnpack_fp32.pte"
    ep = torch.export.export(ctx.model, (ctx.example(1),))
    _lower_to_pte(ep, path)
    log.info("executorch fp32: lowered to XNNPACK")
    return _entry(path, "executorch", "fp32", "executorch", 1)


def export_xnnpack_int8(ctx: ExportContext) -> dict:
    """PT2E static int8: XNNPACKQuantizer (symmetric, per-channel) calibrated on real training images."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    path = ctx.out_dir / f"{ctx.arch}_xnnpack_int8.pte"
    example = (ctx.example(1),)
    graph = torch.export.export(ctx.model, example).module()
    class _Quantizer(XNNPACKQuantizer):
        """XNNPACKQuantizer that leaves fp32_nodes' nodes alone: its filter function is not consulted by every
        pattern (the output concatenation was still annotated, so logits and distance came out on an 8-bit grid:
        26 distinct distances in 300 validation pictures, benchmarks.int8_fidelity), so the annotations are
        removed after the fact."""

        def annotate(self, model):
            model = super().annotate(model)
            for node in model.graph.nodes:
                if node.op == "call_function" and not _outside_fp32_modules(node):
                    node.meta.pop("quantization_annotation", None)
            return model

    quantizer = _Quantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    quantizer.set_filter_function(_outside_fp32_modules)  # input normalisation, head, distance: fp32 (fp32_nodes)
    prepared = prepare_pt2e(graph, quantizer)
    with torch.no_grad():
        for i in range(len(ctx.calib)):
            prepared(torch.from_numpy(ctx.calib[i:i + 1]))
    converted = convert_pt2e(prepared)
    _lower_to_pte(torch.export.export(converted, example), path)
    log.info("executorch int8: calibrated on %d training images, lowered to XNNPACK", len(ctx.calib))
    return _entry(path, "executorch", "int8", "executorch", 1)


# ----------------------------------------------------------------------------- Core ML

class _WithSoftmax(torch.nn.Module):
    """Core ML classifiers report probabilities; iOS apps read classLabel + the probability dict. A classifier
    has one output per class, so the feature distance column (train.distance), if any, is left out."""

    def __init__(self, model: torch.nn.Module, n_classes: int):
        super().__init__()
        self.model, self.n_classes = model, n_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        if out.shape[1] > self.n_classes:  # decided while tracing; a no-op slice would be an `alias` Core ML refuses
            out = out[:, :self.n_classes]
        return torch.softmax(out, dim=1)


def _export_coreml(ctx: ExportContext, precision: str) -> dict:
    import coremltools as ct

    path = ctx.out_dir / f"{ctx.arch}_coreml_{precision}.mlpackage"
    # A classifier has one output per class: the feature distance is left out of the graph, not computed and dropped.
    distance, ctx.model.distance = getattr(ctx.model, "distance", None), None
    try:
        # torch.jit.trace fails on timm's MobileViT; torch.export works.
        ep = torch.export.export(_WithSoftmax(ctx.model, len(ctx.classes)).eval(),
                                 (ctx.example(1),)).run_decompositions({})
    finally:
        ctx.model.distance = distance
    s = ctx.input_size
    mlmodel = ct.convert(
        ep,
        # An image input: iOS passes a CVPixelBuffer of S x S RGB; Core ML multiplies by 1/255 itself.
        inputs=[ct.ImageType(name=INPUT_NAME, shape=(1, 3, s, s), scale=1 / 255.0, bias=[0, 0, 0],
                             color_layout=ct.colorlayout.RGB)],
        classifier_config=ct.ClassifierConfig(list(ctx.classes)),
        convert_to="mlprogram",
        compute_precision=ct.precision.FLOAT16 if precision == "fp16" else ct.precision.FLOAT32,
        minimum_deployment_target=ct.target.iOS16,
    )
    mlmodel.short_description = f"{ctx.arch} blood/bone-marrow cell classifier ({len(ctx.classes)} classes)"
    mlmodel.author = "cellvit-mobile"
    mlmodel.license = "Research use only"
    mlmodel.version = ctx.metadata.get("version", "")
    for k, v in ctx.metadata.items():
        mlmodel.user_defined_metadata[k] = v
    mlmodel.save(str(path))
    log.info("coreml %s: ML Program saved (numerics can only be checked on macOS)", precision)
    e = _entry(path, "coreml", precision, "coreml", 1)
    e.update(input=INPUT_NAME, input_kind="image_rgb_scale_1/255", output="classLabel_probs",
             output_kind="probabilities", label_output="classLabel", feature_distance_column=None)
    return e


def export_coreml_fp16(ctx: ExportContext) -> dict:
    return _export_coreml(ctx, "fp16")


def export_coreml_fp32(ctx: ExportContext) -> dict:
    return _export_coreml(ctx, "fp32")


def _entry(path: Path, fmt: str, precision: str, runtime: str, batch: int | str) -> dict:
    return {"file": path.name, "format": fmt, "precision": precision, "runtime": runtime, "batch": batch,
            "input": INPUT_NAME, "output": OUTPUT_NAME, "output_kind": "logits"}


def with_distance_column(entry: dict, model: torch.nn.Module, n_classes: int) -> dict:
    """Record in a logits artifact's entry which output column is the feature distance (None: it has none)."""
    if entry.get("output_kind", "logits") == "logits":
        entry["feature_distance_column"] = n_classes if getattr(model, "distance", None) is not None else None
    return entry


# Order matters: onnx_int8 starts from onnx_fp32.
EXPORTERS: dict[str, Callable[[ExportContext], dict]] = {
    "onnx_fp32": export_onnx_fp32,
    "onnx_int8": export_onnx_int8,
    "xnnpack_fp32": export_xnnpack_fp32,
    "xnnpack_int8": export_xnnpack_int8,
    "coreml_fp16": export_coreml_fp16,
    "coreml_fp32": export_coreml_fp32,
}
