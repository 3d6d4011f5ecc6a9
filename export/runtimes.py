"""Runners that execute one exported artifact in its real runtime: [N, 3, S, S] float32 0..1 -> [N, C]."""
from __future__ import annotations

import logging
import platform
from pathlib import Path

import numpy as np

log = logging.getLogger("export")


class RuntimeUnavailable(RuntimeError):
    """The artifact's runtime cannot run on this machine (e.g. Core ML off macOS); says why."""


class OnnxRunner:
    def __init__(self, path: Path, threads: int = 0):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, x: np.ndarray, batch: int = 32) -> np.ndarray:
        outs = [self.session.run(None, {self.input_name: x[i:i + batch]})[0] for i in range(0, len(x), batch)]
        return np.concatenate(outs).astype(np.float32)


class ExecutorchRunner:
    """executorch.runtime with the XNNPACK delegate; the .pte has a static batch of 1."""

    def __init__(self, path: Path):
        from executorch.runtime import Runtime

        self.method = Runtime.get().load_program(str(path)).load_method("forward")

    def __call__(self, x: np.ndarray) -> np.ndarray:
        import torch

        return np.concatenate([self.method.execute([torch.from_numpy(np.ascontiguousarray(x[i:i + 1]))])[0].numpy()
                               for i in range(len(x))]).astype(np.float32)


class CoreMLRunner:
    """MLModel.predict on macOS; anywhere else the constructor raises RuntimeUnavailable."""

    def __init__(self, path: Path, classes: list[str]):
        if platform.system() != "Darwin":
            raise RuntimeUnavailable("Core ML prediction needs macOS; structural checks only on "
                                     f"{platform.system()}")
        import coremltools as ct

        self.model, self.classes = ct.models.MLModel(str(path)), classes

    def __call__(self, x: np.ndarray) -> np.ndarray:
        from PIL import Image

        out = []
        for img in x:  # [3, S, S] float32 0..1 -> the uint8 RGB image Core ML's ImageType expects
            pil = Image.fromarray(np.round(img.transpose(1, 2, 0) * 255).astype(np.uint8))
            probs = self.model.predict({"image": pil})
            d = next(v for v in probs.values() if isinstance(v, dict))
            out.append([d[c] for c in self.classes])
        return np.asarray(out, dtype=np.float32)


def coreml_structure(path: Path, classes: list[str], input_size: int) -> list[str]:
    """Checks a .mlpackage without running it (works on Linux). Returns the problems found (empty: fine)."""
    import coremltools as ct

    problems = []
    spec = ct.utils.load_spec(str(path))
    desc = spec.description
    inputs = {i.name: i for i in desc.input}
    if "image" not in inputs:
        problems.append(f"no input named 'image' (have {list(inputs)})")
    else:
        t = inputs["image"].type
        if t.WhichOneof("Type") != "imageType":
            problems.append("input 'image' is not an image type")
        elif (t.imageType.width, t.imageType.height) != (input_size, input_size):
            problems.append(f"input image is {t.imageType.width}x{t.imageType.height}, expected {input_size}")
        elif t.imageType.colorSpace != ct.proto.FeatureTypes_pb2.ImageFeatureType.RGB:
            problems.append("input image colour space is not RGB")
    outputs = [o.name for o in desc.output]
    if desc.predictedFeatureName != "classLabel" or "classLabel" not in outputs:
        problems.append(f"no classLabel output (outputs {outputs})")
    labels = _labels(spec)
    if labels != list(classes):
        problems.append(f"class labels {labels} differ from {classes}")
    meta = dict(desc.metadata.userDefined)
    if meta.get("classes") != ",".join(classes):
        problems.append("metadata 'classes' missing or wrong")
    # The 1/255 scale of ImageType becomes a multiply in the ML Program; find its constant.
    prog_text = str(spec.mlProgram)
    if "0.00392156" not in prog_text and "0.0039215" not in prog_text:
        problems.append("no 1/255 input scale found in the program")
    return problems


def _labels(spec) -> list[str]:
    """Class labels of an ML Program classifier: the constant list fed to its `classify` op."""
    fn = spec.mlProgram.functions["main"]
    block = fn.block_specializations[fn.opset]
    consts = {o.outputs[0].name: o for o in block.operations if o.type == "const"}
    for op in block.operations:
        if op.type != "classify":
            continue
        arg = op.inputs["classes"].arguments[0]
        val = arg.value if arg.HasField("value") else consts[arg.name].attributes["val"]
        return [v.immediateValue.tensor.strings.values[0] for v in val.immediateValue.list.values]
    return []
