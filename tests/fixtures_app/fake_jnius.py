"""A fake of pyjnius + ONNX Runtime Android + ExecuTorch Android: same class and method names, real numerics.

Only what the app calls is implemented, with the Java signatures' checks (float[] must hold floats,
long[] ints, fromBlob(FloatBuffer) a direct buffer of numel capacity, Result.get(i) typed as the
OnnxValue interface so a cast to OnnxTensor is needed, ...). Numbers come from the real desktop
engines (onnxruntime, executorch's Python runtime) run on the same model file, so the Android call
sequence is checked end to end. Every Java call is appended to `calls`, and every `autoclass` call to
`autoclass_threads` with the Python thread it ran on (python-for-android's pyjnius cannot find AAR
classes off the main thread, so the app must resolve them all on it).
"""
from __future__ import annotations

import math
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np


class JavaException(Exception):
    """pyjnius raises this when the Java side throws."""


def _float_array(values: Any, what: str) -> list[float]:
    if not isinstance(values, (list, tuple)) or not all(isinstance(v, float) for v in values):
        raise TypeError(f"{what}: expected float[] (a list of Python floats)")
    return list(values)


def _long_array(values: Any, what: str) -> list[int]:
    if not isinstance(values, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise TypeError(f"{what}: expected long[] (a list of Python ints)")
    return list(values)


class FakeJVM:
    """Holds the fake classes and the call log; pass `bridge()` where the app expects pyjnius."""

    def __init__(self, missing: tuple[str, ...] = (), sdk_int: int = 34,
                 failing_providers: tuple[str, ...] = ()) -> None:
        """`missing`: Java classes absent from the build (as when an AAR was left out); `sdk_int`: the
        phone's API level; `failing_providers`: execution providers whose SessionOptions.addX throws
        (as in an onnxruntime-android build without them)."""
        self.calls: list[str] = []
        self.closed: list[str] = []
        self.autoclass_threads: list[tuple[str, threading.Thread]] = []
        self.sessions: list[Any] = []  # every OrtSession created, with the providers it was given
        self.missing = missing
        jvm = self

        # ------------------------------------------------------------ java.nio / java.util

        class FloatBuffer:
            def __init__(self, data: list[float], direct: bool):
                self._data, self._direct, self._pos = [float(v) for v in data], direct, 0

            @staticmethod
            def wrap(array: list[float]) -> FloatBuffer:
                jvm.calls.append("FloatBuffer.wrap")
                return FloatBuffer(_float_array(array, "FloatBuffer.wrap"), direct=False)

            def put(self, array: list[float]) -> FloatBuffer:
                jvm.calls.append("FloatBuffer.put")
                array = _float_array(array, "FloatBuffer.put")
                if self._pos + len(array) > len(self._data):
                    raise JavaException("java.nio.BufferOverflowException")
                self._data[self._pos:self._pos + len(array)] = array
                self._pos += len(array)
                return self

            def get(self, index: int) -> float:
                if not 0 <= index < len(self._data):
                    raise JavaException("java.lang.IndexOutOfBoundsException")
                return self._data[index]

            def capacity(self) -> int:
                return len(self._data)

            def isDirect(self) -> bool:  # noqa: N802 - Java name
                return self._direct

        class HashMap:
            def __init__(self) -> None:
                self._d: dict = {}

            def put(self, key: Any, value: Any) -> Any:
                jvm.calls.append("HashMap.put")
                if not isinstance(key, str):
                    raise TypeError("HashMap<String, OnnxTensor>.put: key must be a String")
                old = self._d.get(key)
                self._d[key] = value
                return old

            def entries(self) -> dict:
                return dict(self._d)

        # ------------------------------------------------------------ ai.onnxruntime

        class OnnxValue:
            """What pyjnius hands back for a method declared to return the OnnxValue interface."""

            def __init__(self, target: OnnxTensor):
                self._target = target

            def getValue(self) -> Any:  # noqa: N802
                return self._target.getValue()

            def close(self) -> None:
                self._target.close()

        class OnnxTensor:
            def __init__(self, data: np.ndarray):
                self._data, self._closed = data, False

            @staticmethod
            def createTensor(env: Any, data: Any, shape: list[int]) -> OnnxTensor:  # noqa: N802
                jvm.calls.append("OnnxTensor.createTensor")
                if not isinstance(env, OrtEnvironment):
                    raise TypeError("createTensor(OrtEnvironment, FloatBuffer, long[]): first argument")
                if not isinstance(data, FloatBuffer):
                    raise TypeError("createTensor(OrtEnvironment, FloatBuffer, long[]): second argument")
                shape = _long_array(shape, "createTensor shape")
                if math.prod(shape) != data.capacity():
                    raise JavaException(f"ai.onnxruntime.OrtException: shape {shape} does not match "
                                        f"{data.capacity()} elements")
                return OnnxTensor(np.asarray(data._data, dtype=np.float32).reshape(shape))

            def getFloatBuffer(self) -> FloatBuffer:  # noqa: N802
                self._check()
                return FloatBuffer(self._data.astype(np.float32).ravel().tolist(), direct=False)

            def getValue(self) -> Any:  # noqa: N802
                self._check()
                return self._data.tolist()

            def close(self) -> None:
                jvm.closed.append("OnnxTensor")
                self._closed = True

            def _check(self) -> None:
                if self._closed:
                    raise JavaException("java.lang.IllegalStateException: closed OnnxTensor")

        class Result:  # OrtSession$Result
            def __init__(self, values: list[OnnxTensor]):
                self._values = values

            def get(self, index: int) -> OnnxValue:
                jvm.calls.append("Result.get")
                return OnnxValue(self._values[index])

            def close(self) -> None:
                jvm.closed.append("Result")

        class OrtSession:
            def __init__(self, path: str):
                import onnxruntime as ort

                try:
                    self._sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
                except Exception as exc:  # noqa: BLE001 - the Java API wraps every failure in OrtException
                    raise JavaException(f"ai.onnxruntime.OrtException: {exc}") from exc
                self._inputs = {i.name for i in self._sess.get_inputs()}

            def run(self, inputs: Any) -> Result:
                jvm.calls.append("OrtSession.run")
                if not isinstance(inputs, HashMap):
                    raise TypeError("OrtSession.run(Map<String, OnnxTensor>)")
                feeds = inputs.entries()
                for name in feeds:
                    if name not in self._inputs:
                        raise JavaException(f"ai.onnxruntime.OrtException: Unknown input name {name}, "
                                            f"expected one of {sorted(self._inputs)}")
                outs = self._sess.run(None, {k: v._data for k, v in feeds.items()})
                return Result([OnnxTensor(np.asarray(o)) for o in outs])

            def close(self) -> None:
                jvm.closed.append("OrtSession")

        class SessionOptions:  # OrtSession$SessionOptions
            def __init__(self) -> None:
                jvm.calls.append("SessionOptions.<init>")
                self.providers: list[str] = []
                self.config: dict[str, str] = {}
                self.intra_op_threads = 0
                self._closed = False

            def addConfigEntry(self, key: str, value: str) -> None:  # noqa: N802
                jvm.calls.append("SessionOptions.addConfigEntry")
                if not isinstance(key, str) or not isinstance(value, str):
                    raise TypeError("addConfigEntry(String, String)")
                self.config[key] = value

            def setIntraOpNumThreads(self, n: int) -> None:  # noqa: N802
                jvm.calls.append("SessionOptions.setIntraOpNumThreads")
                if not isinstance(n, int):
                    raise TypeError("setIntraOpNumThreads(int)")
                self.intra_op_threads = n

            def addXnnpack(self, options: Any) -> None:  # noqa: N802
                jvm.calls.append("SessionOptions.addXnnpack")
                if not isinstance(options, HashMap) or not all(
                        isinstance(k, str) and isinstance(v, str) for k, v in options.entries().items()):
                    raise TypeError("addXnnpack(Map<String, String>)")
                self._add("xnnpack")

            def addNnapi(self) -> None:  # noqa: N802
                jvm.calls.append("SessionOptions.addNnapi")
                self._add("nnapi")

            def _add(self, provider: str) -> None:
                if self._closed:
                    raise JavaException("java.lang.IllegalStateException: Trying to use a closed SessionOptions")
                if provider in failing_providers:
                    raise JavaException(f"ai.onnxruntime.OrtException: {provider} execution provider is not "
                                        f"supported in this build")
                self.providers.append(provider)

            def close(self) -> None:
                jvm.closed.append("SessionOptions")
                self._closed = True

        class OrtEnvironment:
            _instance: OrtEnvironment | None = None

            @staticmethod
            def getEnvironment() -> OrtEnvironment:  # noqa: N802
                jvm.calls.append("OrtEnvironment.getEnvironment")
                if OrtEnvironment._instance is None:
                    OrtEnvironment._instance = OrtEnvironment()
                return OrtEnvironment._instance

            def createSession(self, path: str, *options: Any) -> OrtSession:  # noqa: N802
                jvm.calls.append("OrtEnvironment.createSession")
                if not isinstance(path, str) or len(options) > 1 or not all(
                        isinstance(o, SessionOptions) for o in options):
                    raise TypeError("createSession(String modelPath[, SessionOptions options])")
                session = OrtSession(path)  # numbers from the desktop CPU provider, whatever was asked for
                session.providers = list(options[0].providers) if options else []
                session.thread = threading.current_thread()
                jvm.sessions.append(session)
                return session

        # ------------------------------------------------------------ org.pytorch.executorch

        class Tensor:
            def __init__(self, data: np.ndarray):
                self._data = data

            @staticmethod
            def allocateFloatBuffer(n: int) -> FloatBuffer:  # noqa: N802
                jvm.calls.append("Tensor.allocateFloatBuffer")
                if not isinstance(n, int):
                    raise TypeError("allocateFloatBuffer(int)")
                return FloatBuffer([0.0] * n, direct=True)

            @staticmethod
            def fromBlob(data: Any, shape: list[int]) -> Tensor:  # noqa: N802
                jvm.calls.append("Tensor.fromBlob")
                shape = _long_array(shape, "fromBlob shape")
                if isinstance(data, FloatBuffer):
                    if not data.isDirect():
                        raise JavaException("java.lang.IllegalArgumentException: Data buffer must be direct")
                    values = data._data
                else:
                    values = _float_array(data, "fromBlob(float[], long[])")
                if len(values) != math.prod(shape):
                    raise JavaException("java.lang.IllegalArgumentException: Inconsistent data capacity")
                return Tensor(np.asarray(values, dtype=np.float32).reshape(shape))

            def getDataAsFloatArray(self) -> list[float]:  # noqa: N802
                jvm.calls.append("Tensor.getDataAsFloatArray")
                return self._data.astype(np.float32).ravel().tolist()

            def shape(self) -> list[int]:
                return list(self._data.shape)

        class EValue:
            def __init__(self, tensor: Tensor):
                self._tensor = tensor

            def toTensor(self) -> Tensor:  # noqa: N802
                jvm.calls.append("EValue.toTensor")
                return self._tensor

            def isTensor(self) -> bool:  # noqa: N802
                return True

        def _evalue_from(tensor: Any) -> EValue:
            jvm.calls.append("EValue.from")
            if not isinstance(tensor, Tensor):
                raise TypeError("EValue.from(Tensor)")
            return EValue(tensor)

        setattr(EValue, "from", staticmethod(_evalue_from))  # `from` is a keyword in Python, not in Java

        class Module:
            def __init__(self, path: str):
                import torch  # noqa: F401 - the Python runtime needs it
                from executorch.runtime import Runtime

                try:
                    self._method = Runtime.get().load_program(Path(path)).load_method("forward")
                except (RuntimeError, ValueError) as exc:
                    raise JavaException(f"java.lang.RuntimeException: cannot load {path}: {exc}") from exc
                self._alive = True

            @staticmethod
            def load(path: str) -> Module:
                jvm.calls.append("Module.load")
                if not isinstance(path, str) or not Path(path).is_file():
                    raise JavaException(f"java.lang.RuntimeException: cannot load model path {path}")
                return Module(path)

            def forward(self, *inputs: EValue) -> list[EValue]:
                jvm.calls.append("Module.forward")
                if not self._alive:
                    return []  # as the real Module after destroy()
                if not all(isinstance(i, EValue) for i in inputs):
                    raise TypeError("forward(EValue...)")
                import torch

                outs = self._method.execute([torch.from_numpy(i._tensor._data.copy()) for i in inputs])
                return [EValue(Tensor(o.detach().numpy())) for o in outs]

            def destroy(self) -> None:
                jvm.closed.append("Module")
                self._alive = False

        self.classes = {
            "java.nio.FloatBuffer": FloatBuffer,
            "java.util.HashMap": HashMap,
            "ai.onnxruntime.OrtEnvironment": OrtEnvironment,
            "ai.onnxruntime.OrtSession": OrtSession,
            "ai.onnxruntime.OrtSession$SessionOptions": SessionOptions,
            "ai.onnxruntime.OrtSession$Result": Result,
            "ai.onnxruntime.OnnxTensor": OnnxTensor,
            "ai.onnxruntime.OnnxValue": OnnxValue,
            "org.pytorch.executorch.Module": Module,
            "org.pytorch.executorch.Tensor": Tensor,
            "org.pytorch.executorch.EValue": EValue,
            "android.os.Build$VERSION": SimpleNamespace(SDK_INT=sdk_int),
        }

    def autoclass(self, name: str) -> Any:
        self.autoclass_threads.append((name, threading.current_thread()))
        if name not in self.classes or name in self.missing:
            raise JavaException(f"java.lang.ClassNotFoundException: {name}")
        self.calls.append(f"autoclass {name}")
        return self.classes[name]

    def cast(self, destclass: Any, obj: Any) -> Any:
        """pyjnius' cast: a class name (pyjnius then calls autoclass itself) or a class object."""
        if isinstance(destclass, str):
            cls = self.autoclass(destclass)
            name = destclass
        else:
            cls = destclass
            name = next(n for n, c in self.classes.items() if c is destclass)
        self.calls.append(f"cast {name}")
        target = getattr(obj, "_target", obj)
        if not isinstance(target, cls):
            raise JavaException(f"java.lang.ClassCastException: {type(target).__name__} -> {name}")
        return target

    def off_main_thread(self) -> list[tuple[str, str]]:
        """The autoclass calls made on a thread other than the main one: (class, thread name)."""
        main = threading.main_thread()
        return [(name, t.name) for name, t in self.autoclass_threads if t is not main]

    def bridge(self) -> SimpleNamespace:
        return SimpleNamespace(autoclass=self.autoclass, cast=self.cast, JavaException=JavaException)
