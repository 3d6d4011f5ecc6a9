"""Inference engines behind one interface: ONNX Runtime / ExecuTorch on desktop and Android, Core ML on iOS."""
from __future__ import annotations

import logging
import os
import sys
import tempfile
import threading
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
    provider: str  # what computes inside the runtime: "cpu", "xnnpack", "nnapi", ... (shown with each result)
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
        self.provider = "cpu"  # CPUExecutionProvider, asked for above
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
        self.provider = pte_delegate(path)
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

# Every Java class the Android runtimes touch, including those pyjnius builds wrappers for when a method
# returns one (OrtSession, OrtSession$Result, OnnxValue, EValue, ...): pyjnius looks those up with
# autoclass too, and finds them in its cache only if they were resolved once before.
ANDROID_JAVA_CLASSES: tuple[str, ...] = (
    "java.nio.FloatBuffer", "java.util.HashMap",
    "ai.onnxruntime.OnnxTensor", "ai.onnxruntime.OrtEnvironment", "ai.onnxruntime.OrtSession",
    "ai.onnxruntime.OrtSession$SessionOptions", "ai.onnxruntime.OrtSession$Result", "ai.onnxruntime.OnnxValue",
    "org.pytorch.executorch.Tensor", "org.pytorch.executorch.EValue", "org.pytorch.executorch.Module",
)
BUILD_VERSION_CLASS = "android.os.Build$VERSION"
ORT_PROVIDER_ENV = "CELLVIT_ORT_PROVIDER"  # "xnnpack" (default), "cpu", or "nnapi" (opt-in only)
ORT_PROVIDERS = ("xnnpack", "cpu", "nnapi")


class JavaClassMissingError(LookupError):
    """A Java class was not found when the classes were resolved at start-up (its AAR is not in the build)."""


def _jnius() -> SimpleNamespace:
    try:
        from jnius import JavaException, autoclass, cast
    except ImportError as exc:
        raise RuntimeUnavailableError("pyjnius is not available: the Android runtimes only work in the "
                                      "Android build") from exc
    return SimpleNamespace(autoclass=autoclass, cast=cast, JavaException=JavaException)


class JavaClasses:
    """Java classes resolved once, on the main thread; the runtimes take classes from here, never from autoclass.

    python-for-android's pyjnius finds classes from the app's Gradle dependencies (the ONNX Runtime and
    ExecuTorch AARs) only on the main thread: a Python thread attached to the JVM gets the system class
    loader, and `autoclass` there fails with ClassNotFoundException. The model is loaded and run on a
    worker thread, so everything it needs is looked up here first; pyjnius caches each class, which
    also covers the wrappers it makes for returned objects.
    """

    def __init__(self, classes: dict[str, Any], missing: dict[str, str], cast: Callable[[Any, Any], Any],
                 java_exception: type[BaseException], sdk_int: int = 0):
        self.classes, self.missing = classes, missing
        self.cast = cast
        self.JavaException = java_exception
        self.sdk_int = sdk_int  # android.os.Build.VERSION.SDK_INT; 0 where unknown

    def get(self, name: str) -> Any:
        if name in self.classes:
            return self.classes[name]
        reason = self.missing.get(name, "not resolved at start-up")
        raise JavaClassMissingError(f"Java class {name} is not available ({reason})")


def resolve_java_classes(jni: SimpleNamespace | None = None,
                         names: tuple[str, ...] = ANDROID_JAVA_CLASSES) -> JavaClasses:
    """Look up every Java class the app needs; call on the main thread (App start-up). Missing ones are noted."""
    if threading.current_thread() is not threading.main_thread():
        log.warning("resolving Java classes off the main thread: classes from the app's AARs may not be found")
    jni = jni or _jnius()
    classes: dict[str, Any] = {}
    missing: dict[str, str] = {}
    for name in names:
        try:
            classes[name] = jni.autoclass(name)
        except jni.JavaException as exc:  # ClassNotFoundException: that AAR is not in this build
            missing[name] = str(exc)
    sdk_int = 0
    try:
        sdk_int = int(jni.autoclass(BUILD_VERSION_CLASS).SDK_INT)
    except (jni.JavaException, AttributeError, TypeError, ValueError) as exc:
        log.warning("cannot read the Android API level: %s", exc)
    if missing:
        log.warning("Java classes not in this build: %s", ", ".join(sorted(missing)))
    log.info("resolved %d Java classes on %s; Android API level %s", len(classes),
             threading.current_thread().name, sdk_int or "unknown")
    return JavaClasses(classes, missing, jni.cast, jni.JavaException, sdk_int)


def _java_classes(bridge: Any) -> JavaClasses:
    """`bridge` as resolved classes: as given, or resolved now from a pyjnius-like bridge (tests, CLI)."""
    if isinstance(bridge, JavaClasses):
        return bridge
    return resolve_java_classes(bridge)


def _java_errors(jc: JavaClasses) -> tuple[type[BaseException], ...]:
    """What a Java call can raise through pyjnius: JavaException (Java threw) and its own conversion errors."""
    return (jc.JavaException, TypeError, ValueError, JavaClassMissingError)


def ort_provider_choice() -> str:
    """The ONNX Runtime execution provider asked for: $CELLVIT_ORT_PROVIDER, else XNNPACK (falls back to CPU).

    NNAPI is opt-in only: Android deprecates it from Android 15, and its drivers gave wrong outputs on
    some phones, which a lab app must not risk silently.
    """
    choice = os.environ.get(ORT_PROVIDER_ENV, "xnnpack").strip().lower() or "xnnpack"
    if choice not in ORT_PROVIDERS:
        log.warning("%s=%r is unknown (use one of %s): using xnnpack", ORT_PROVIDER_ENV, choice,
                    ", ".join(ORT_PROVIDERS))
        return "xnnpack"
    return choice


class OrtAndroid:
    """ONNX Runtime Android (com.microsoft.onnxruntime:onnxruntime-android) through pyjnius.

    Java: env = OrtEnvironment.getEnvironment(); opts = new OrtSession.SessionOptions(); opts.addXnnpack(Map)
    (or addNnapi(), or nothing: CPU); session = env.createSession(path, opts);
    tensor = OnnxTensor.createTensor(env, FloatBuffer.wrap(float[]), long[] shape);
    result = session.run(Map{input: tensor}); ((OnnxTensor) result.get(0)).getFloatBuffer().
    """

    name = "onnxruntime-android"

    def __init__(self, path: Path, artifact: Artifact, jni: Any = None, provider: str | None = None):
        self._jc = _java_classes(jni)
        self._errors = _java_errors(self._jc)
        self._session = self._options = None
        try:
            self._FloatBuffer = self._jc.get("java.nio.FloatBuffer")
            self._HashMap = self._jc.get("java.util.HashMap")
            self._OnnxTensor = self._jc.get("ai.onnxruntime.OnnxTensor")
            self._SessionOptions = self._jc.get("ai.onnxruntime.OrtSession$SessionOptions")
            self._env = self._jc.get("ai.onnxruntime.OrtEnvironment").getEnvironment()
        except self._errors as exc:
            raise RuntimeUnavailableError(f"ONNX Runtime Android cannot load {Path(path).name}: {exc}") from exc
        wanted = provider or ort_provider_choice()
        for choice in dict.fromkeys((wanted, "cpu")):  # the asked-for provider, then plain CPU
            try:
                self._session, self._options = self._open(str(path), choice)
            except self._errors as exc:
                if choice == "cpu":
                    raise RuntimeUnavailableError(
                        f"ONNX Runtime Android cannot load {Path(path).name}: {exc}") from exc
                log.warning("ONNX Runtime Android: the %s provider failed (%s); using the CPU provider", choice, exc)
                continue
            self.provider = choice
            break
        log.info("ONNX Runtime Android runs %s on the %s provider", Path(path).name, self.provider)
        self._input = artifact.input_name
        self.output_kind = artifact.output_kind

    def _open(self, path: str, provider: str) -> tuple[Any, Any]:
        opts = self._SessionOptions()
        try:
            if provider == "xnnpack":
                # ONNX Runtime's advice for XNNPACK: its own thread pool does the work, ORT's stays at 1 and
                # does not spin, so the two pools do not fight over the cores.
                threads = str(max(1, min(4, os.cpu_count() or 1)))
                xnn = self._HashMap()
                xnn.put("intra_op_num_threads", threads)
                opts.addConfigEntry("session.intra_op.allow_spinning", "0")
                opts.setIntraOpNumThreads(1)
                opts.addXnnpack(xnn)
            elif provider == "nnapi":
                opts.addNnapi()
            return self._env.createSession(path, opts), opts
        except self._errors:
            opts.close()
            raise

    def run(self, x: np.ndarray) -> np.ndarray:
        x = _check_input(x)  # [1, 3, S, S] float32 in 0..1
        tensor = result = None
        try:
            buf = self._FloatBuffer.wrap(x.ravel().tolist())  # float[] of 3*S*S, NCHW order
            tensor = self._OnnxTensor.createTensor(self._env, buf, [int(d) for d in x.shape])  # long[] shape
            feeds = self._HashMap()
            feeds.put(self._input, tensor)
            result = self._session.run(feeds)
            # cast with the class object: cast("name", ...) would call autoclass on this worker thread
            out = self._jc.cast(self._OnnxTensor, result.get(0))  # [1, C] float32
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
        if self._options is not None:  # only after the session: it uses the options until closed
            self._options.close()
            self._options = None


class ExecuTorchAndroid:
    """ExecuTorch Android (org.pytorch:executorch-android) through pyjnius.

    Java: module = Module.load(path); buf = Tensor.allocateFloatBuffer(n); buf.put(float[]);
    t = Tensor.fromBlob(buf, long[] shape); out = module.forward(EValue.from(t))[0].toTensor();
    out.getDataAsFloatArray(). The FloatBuffer overload of fromBlob is used because pyjnius cannot
    tell fromBlob(float[], long[]) from fromBlob(double[], long[]) for a Python list.
    """

    name = "executorch-android"

    def __init__(self, path: Path, artifact: Artifact, jni: Any = None):
        self._jc = _java_classes(jni)
        self._errors = _java_errors(self._jc)
        try:
            self._Tensor = self._jc.get("org.pytorch.executorch.Tensor")
            self._EValue = self._jc.get("org.pytorch.executorch.EValue")
            self._module = self._jc.get("org.pytorch.executorch.Module").load(str(path))
        except self._errors as exc:
            raise RuntimeUnavailableError(f"ExecuTorch Android cannot load {Path(path).name}: {exc}") from exc
        self.provider = pte_delegate(path)  # the delegate is chosen at export, inside the .pte
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


def pte_delegate(path: Path | str) -> str:
    """'xnnpack' if the .pte delegates to XNNPACK (its backend id is stored in the program), else 'portable'."""
    try:
        data = Path(path).read_bytes()
    except OSError:
        return "unknown"
    return "xnnpack" if b"XnnpackBackend" in data else "portable"


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
        self.provider = "coreml"  # Core ML itself picks CPU, GPU or Neural Engine
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
