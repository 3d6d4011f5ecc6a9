"""Inference engines behind one interface: ONNX Runtime / ExecuTorch on desktop and Android, Core ML on iOS."""
from __future__ import annotations

import logging
import os
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Protocol
from collections.abc import Callable

import numpy as np

from mobile_app.errors import InferenceError, RuntimeUnavailableError
from mobile_app.manifest import Artifact

log = logging.getLogger(__name__)

# Which formats each platform can run, best first.
PLATFORM_FORMATS: dict[str, tuple[str, ...]] = {
    "android": ("onnx", "executorch"),
    "ios": ("coreml",),
    "desktop": ("onnx", "executorch"),
}
K_CV_PIXEL_FORMAT_32BGRA = 0x42475241  # kCVPixelFormatType_32BGRA, the FourCC 'BGRA'


class Runtime(Protocol):
    """run(x) takes [1, 3, S, S] float32 RGB in 0..1 and returns [C] float32 (logits or probabilities)."""

    name: str
    output_kind: str  # "logits" | "probabilities"

    def run(self, x: np.ndarray) -> np.ndarray: ...

    def close(self) -> None: ...


def detect_platform() -> str:
    """'android', 'ios' or 'desktop', decided as kivy.utils.platform does, without importing Kivy."""
    build = os.environ.get("KIVY_BUILD", "")
    if build in ("android", "ios"):
        return build
    if "P4A_BOOTSTRAP" in os.environ or "ANDROID_ARGUMENT" in os.environ:
        return "android"
    if sys.platform == "ios":
        return "ios"
    return "desktop"


def _check_input(x: np.ndarray, size: int | None = None) -> np.ndarray:
    if x.dtype != np.float32 or x.ndim != 4 or x.shape[:2] != (1, 3) or x.shape[2] != x.shape[3]:
        raise InferenceError(f"model input must be [1, 3, S, S] float32, got {list(x.shape)} {x.dtype}")
    if size is not None and x.shape[2] != size:
        raise InferenceError(f"model input must be {size}x{size} px, got {x.shape[2]}x{x.shape[3]}")
    return np.ascontiguousarray(x)


# ----------------------------------------------------------------------------- desktop

class OnnxRuntimeDesktop:
    """onnxruntime's Python API (desktop, CI)."""

    name = "onnxruntime"

    def __init__(self, path: Path, artifact: Artifact, threads: int | None = None):
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise RuntimeUnavailableError("ONNX Runtime is not installed (pip install onnxruntime)") from exc
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or min(2, os.cpu_count() or 1)
        opts.log_severity_level = 3
        try:
            self._session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except (RuntimeError, ValueError, OSError) as exc:  # onnxruntime's Fail/InvalidProtobuf are RuntimeErrors
            raise RuntimeUnavailableError(f"ONNX Runtime cannot load {path.name}: {exc}") from exc
        inputs = [i.name for i in self._session.get_inputs()]
        outputs = [o.name for o in self._session.get_outputs()]
        self._input = artifact.input_name if artifact.input_name in inputs else inputs[0]
        self._output = artifact.output_name if artifact.output_name in outputs else outputs[0]
        self.output_kind = artifact.output_kind

    def run(self, x: np.ndarray) -> np.ndarray:
        x = _check_input(x)  # [1, 3, S, S] float32 in 0..1
        try:
            (out,) = self._session.run([self._output], {self._input: x})  # [1, C] float32
        except (RuntimeError, ValueError) as exc:
            raise InferenceError(f"ONNX Runtime failed: {exc}") from exc
        return np.asarray(out, dtype=np.float32).reshape(-1)  # [C]

    def close(self) -> None:
        self._session = None


class ExecuTorchDesktop:
    """ExecuTorch's Python runtime (needs torch, imported here only)."""

    name = "executorch"

    def __init__(self, path: Path, artifact: Artifact):
        try:
            import torch
            from executorch.runtime import Runtime as EtRuntime
        except ImportError as exc:
            raise RuntimeUnavailableError("the ExecuTorch Python runtime is not installed "
                                          "(pip install executorch; it needs torch)") from exc
        self._torch = torch
        try:
            program = EtRuntime.get().load_program(Path(path))
            self._method = program.load_method("forward")
        except (RuntimeError, ValueError, OSError) as exc:
            raise RuntimeUnavailableError(f"ExecuTorch cannot load {path.name}: {exc}") from exc
        if self._method is None:
            raise RuntimeUnavailableError(f"{path.name} has no 'forward' method")
        self.output_kind = artifact.output_kind

    def run(self, x: np.ndarray) -> np.ndarray:
        x = _check_input(x)  # [1, 3, S, S] float32 in 0..1
        try:
            outputs = self._method.execute([self._torch.from_numpy(x)])  # ([1, C] float32,)
        except (RuntimeError, ValueError) as exc:
            raise InferenceError(f"ExecuTorch failed: {exc}") from exc
        return outputs[0].detach().cpu().numpy().astype(np.float32).reshape(-1)  # [C]

    def close(self) -> None:
        self._method = None


# ----------------------------------------------------------------------------- Android (pyjnius)

def _jnius() -> SimpleNamespace:
    try:
        from jnius import JavaException, autoclass, cast
    except ImportError as exc:
        raise RuntimeUnavailableError("pyjnius is not available: the Android runtimes only work in the "
                                      "Android build") from exc
    return SimpleNamespace(autoclass=autoclass, cast=cast, JavaException=JavaException)


def _java_errors(jni: SimpleNamespace) -> tuple[type[BaseException], ...]:
    """What a Java call can raise through pyjnius: JavaException (Java threw) and its own conversion errors."""
    return (jni.JavaException, TypeError, ValueError)


class OrtAndroid:
    """ONNX Runtime Android (com.microsoft.onnxruntime:onnxruntime-android) through pyjnius.

    Java: env = OrtEnvironment.getEnvironment(); session = env.createSession(path);
    tensor = OnnxTensor.createTensor(env, FloatBuffer.wrap(float[]), long[] shape);
    result = session.run(Map{input: tensor}); ((OnnxTensor) result.get(0)).getFloatBuffer().
    """

    name = "onnxruntime-android"

    def __init__(self, path: Path, artifact: Artifact, jni: SimpleNamespace | None = None):
        self._jni = jni or _jnius()
        ac = self._jni.autoclass
        self._errors = _java_errors(self._jni)
        try:
            self._FloatBuffer = ac("java.nio.FloatBuffer")
            self._HashMap = ac("java.util.HashMap")
            self._OnnxTensor = ac("ai.onnxruntime.OnnxTensor")
            self._env = ac("ai.onnxruntime.OrtEnvironment").getEnvironment()
            self._session = self._env.createSession(str(path))
        except self._errors as exc:
            raise RuntimeUnavailableError(f"ONNX Runtime Android cannot load {Path(path).name}: {exc}") from exc
        self._input = artifact.input_name
        self.output_kind = artifact.output_kind

    def run(self, x: np.ndarray) -> np.ndarray:
        x = _check_input(x)  # [1, 3, S, S] float32 in 0..1
        tensor = result = None
        try:
            buf = self._FloatBuffer.wrap(x.ravel().tolist())  # float[] of 3*S*S, NCHW order
            tensor = self._OnnxTensor.createTensor(self._env, buf, [int(d) for d in x.shape])  # long[] shape
            feeds = self._HashMap()
            feeds.put(self._input, tensor)
            result = self._session.run(feeds)
            out = self._jni.cast("ai.onnxruntime.OnnxTensor", result.get(0))  # [1, C] float32
            fb = out.getFloatBuffer()
            logits = [fb.get(i) for i in range(fb.capacity())]
        except self._errors as exc:
            raise InferenceError(f"ONNX Runtime Android failed: {exc}") from exc
        finally:
            if result is not None:
                result.close()
            if tensor is not None:
                tensor.close()
        return np.asarray(logits, dtype=np.float32)  # [C]

    def close(self) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None


class ExecuTorchAndroid:
    """ExecuTorch Android (org.pytorch:executorch-android) through pyjnius.

    Java: module = Module.load(path); buf = Tensor.allocateFloatBuffer(n); buf.put(float[]);
    t = Tensor.fromBlob(buf, long[] shape); out = module.forward(EValue.from(t))[0].toTensor();
    out.getDataAsFloatArray(). The FloatBuffer overload of fromBlob is used because pyjnius cannot
    tell fromBlob(float[], long[]) from fromBlob(double[], long[]) for a Python list.
    """

    name = "executorch-android"

    def __init__(self, path: Path, artifact: Artifact, jni: SimpleNamespace | None = None):
        self._jni = jni or _jnius()
        ac = self._jni.autoclass
        self._errors = _java_errors(self._jni)
        try:
            self._Tensor = ac("org.pytorch.executorch.Tensor")
            self._EValue = ac("org.pytorch.executorch.EValue")
            self._module = ac("org.pytorch.executorch.Module").load(str(path))
        except self._errors as exc:
            raise RuntimeUnavailableError(f"ExecuTorch Android cannot load {Path(path).name}: {exc}") from exc
        self.output_kind = artifact.output_kind

    def run(self, x: np.ndarray) -> np.ndarray:
        x = _check_input(x)  # [1, 3, S, S] float32 in 0..1
        try:
            buf = self._Tensor.allocateFloatBuffer(int(x.size))  # direct, native order
            buf.put(x.ravel().tolist())  # float[] of 3*S*S, NCHW order
            tensor = self._Tensor.fromBlob(buf, [int(d) for d in x.shape])  # long[] shape
            evalue = getattr(self._EValue, "from")(tensor)  # `from` is a Python keyword
            outputs = self._module.forward(evalue)  # EValue[]
            if not outputs:  # a destroyed Module returns an empty array instead of raising
                raise InferenceError("ExecuTorch Android returned no output")
            logits = outputs[0].toTensor().getDataAsFloatArray()  # float[C]
        except self._errors as exc:
            raise InferenceError(f"ExecuTorch Android failed: {exc}") from exc
        return np.asarray(list(logits), dtype=np.float32)  # [C]

    def close(self) -> None:
        if self._module is not None:
            self._module.destroy()
            self._module = None


# ----------------------------------------------------------------------------- iOS (pyobjus)

def _pyobjus() -> SimpleNamespace:
    try:
        from pyobjus import autoclass, objc_dict, objc_str
        from pyobjus.dylib_manager import load_framework
    except ImportError as exc:
        raise RuntimeUnavailableError("pyobjus is not available: Core ML only works in the iOS build") from exc
    return SimpleNamespace(autoclass=autoclass, objc_str=objc_str, objc_dict=objc_dict,
                           load_framework=load_framework)


class CoreMLRuntime:
    """Core ML through pyobjus; the model takes an image (scale 1/255 inside) and returns class probabilities.

    ObjC: url = [MLModel compileModelAtURL:error:] (for .mlpackage/.mlmodel);
    model = [MLModel modelWithContentsOfURL:error:]; value = [MLFeatureValue
    featureValueWithImageAtURL:pixelsWide:pixelsHigh:pixelFormatType:options:error:];
    provider = [[MLDictionaryFeatureProvider alloc] initWithDictionary:error:];
    out = [model predictionFromFeatures:error:]; [[out featureValueForName:] dictionaryValue].
    """

    name = "coreml"

    def __init__(self, path: Path, artifact: Artifact, classes: list[str], size: int,
                 objc: SimpleNamespace | None = None):
        self._objc = objc or _pyobjus()
        o = self._objc
        o.load_framework("/System/Library/Frameworks/CoreML.framework")
        self._NSURL = o.autoclass("NSURL")
        self._MLModel = o.autoclass("MLModel")
        self._MLFeatureValue = o.autoclass("MLFeatureValue")
        self._Provider = o.autoclass("MLDictionaryFeatureProvider")
        url = self._NSURL.fileURLWithPath_(o.objc_str(str(path)))
        if Path(path).suffix in (".mlpackage", ".mlmodel"):
            url = self._MLModel.compileModelAtURL_error_(url, None)  # -> .mlmodelc in a temp folder
            if url is None:
                raise RuntimeUnavailableError(f"Core ML cannot compile {Path(path).name}")
        self._model = self._MLModel.modelWithContentsOfURL_error_(url, None)
        if self._model is None:
            raise RuntimeUnavailableError(f"Core ML cannot load {Path(path).name}")
        self._classes, self._size = list(classes), size
        self._input, self._output = artifact.input_name, artifact.output_name
        self._tmp = Path(tempfile.mkdtemp(prefix="cellvit-coreml-"))
        self.output_kind = "probabilities"

    def run(self, x: np.ndarray) -> np.ndarray:
        x = _check_input(x, self._size)  # [1, 3, S, S] float32 in 0..1 (exactly k/255)
        from PIL import Image

        o = self._objc
        hwc = np.rint(x[0].transpose(1, 2, 0) * 255.0).clip(0, 255).astype(np.uint8)  # [S, S, 3] uint8, lossless
        png = self._tmp / "input.png"
        Image.fromarray(hwc).save(png)
        url = self._NSURL.fileURLWithPath_(o.objc_str(str(png)))
        value = self._MLFeatureValue.featureValueWithImageAtURL_pixelsWide_pixelsHigh_pixelFormatType_options_error_(
            url, self._size, self._size, K_CV_PIXEL_FORMAT_32BGRA, None, None)
        if value is None:
            raise InferenceError("Core ML could not read the input image")
        provider = self._Provider.alloc().initWithDictionary_error_(o.objc_dict({self._input: value}), None)
        out = self._model.predictionFromFeatures_error_(provider, None)
        if out is None:
            raise InferenceError("Core ML prediction failed")
        probs = out.featureValueForName_(o.objc_str(self._output))
        if probs is None:
            raise InferenceError(f"Core ML model has no output {self._output!r}")
        table = probs.dictionaryValue()  # NSDictionary<NSString, NSNumber>: class name -> probability
        result = []
        for name in self._classes:
            number = table.objectForKey_(o.objc_str(name))
            if number is None:
                raise InferenceError(f"Core ML output has no probability for class {name!r}")
            result.append(number.doubleValue())
        return np.asarray(result, dtype=np.float32)  # [C] probabilities

    def close(self) -> None:
        self._model = None


# ----------------------------------------------------------------------------- choice

Factory = Callable[..., Runtime]


def create_runtime(artifact: Artifact, path: Path, platform: str, classes: list[str], size: int,
                   bridge: Any = None) -> Runtime:
    """The engine for `artifact` on `platform`; `bridge` replaces pyjnius/pyobjus (tests pass fakes)."""
    key = (platform, artifact.format)
    log.info("loading %s with the %s runtime for %s", artifact.file, artifact.format, platform)
    if key == ("desktop", "onnx"):
        return OnnxRuntimeDesktop(path, artifact)
    if key == ("desktop", "executorch"):
        return ExecuTorchDesktop(path, artifact)
    if key == ("android", "onnx"):
        return OrtAndroid(path, artifact, bridge)
    if key == ("android", "executorch"):
        return ExecuTorchAndroid(path, artifact, bridge)
    if key == ("ios", "coreml"):
        return CoreMLRuntime(path, artifact, classes, size, bridge)
    supported = ", ".join(PLATFORM_FORMATS.get(platform, ()))
    raise RuntimeUnavailableError(f"no runtime for {artifact.format} models on {platform} (supported: {supported})")
