"""The public Java API the Android runtimes offer, as their sources document it (the pinned versions).

Written by hand from the sources, not from the fakes, so a fake (and the app code it lets pass) cannot
invent a method the phone does not have:
- onnxruntime-android 1.24: microsoft/onnxruntime java/src/main/java/ai/onnxruntime/{OrtEnvironment,OrtSession,
  OnnxTensor,OnnxValue}.java (OrtSession.SessionOptions.addXnnpack(Map<String,String>), addNnapi(),
  addConfigEntry, setIntraOpNumThreads; OrtSession.run(Map<String,OnnxTensor>) -> Result; Result.get(int)).
- executorch-android 1.5: pytorch/executorch extension/android/executorch_android/src/main/java/org/pytorch/
  executorch/{Module,Tensor,EValue} (Module.load is @JvmStatic; forward(vararg EValue): Array<EValue>).
- java.nio.FloatBuffer and java.util.HashMap: the Java SE API.
"""
from __future__ import annotations

DOCUMENTED_JAVA_API: dict[str, frozenset[str]] = {
    "java.nio.FloatBuffer": frozenset({"wrap", "allocate", "put", "get", "capacity", "isDirect", "rewind", "array",
                                        "limit", "position", "order"}),
    "java.util.HashMap": frozenset({"put", "get", "size", "isEmpty", "containsKey", "remove", "clear"}),
    "ai.onnxruntime.OrtEnvironment": frozenset({"getEnvironment", "createSession", "close", "getVersion"}),
    "ai.onnxruntime.OrtSession": frozenset({"run", "close", "getInputNames", "getOutputNames", "getInputInfo",
                                            "getOutputInfo", "getNumInputs", "getNumOutputs"}),
    "ai.onnxruntime.OrtSession$SessionOptions": frozenset({
        "addXnnpack", "addNnapi", "addCPU", "addConfigEntry", "setIntraOpNumThreads", "setInterOpNumThreads",
        "setOptimizationLevel", "setExecutionMode", "close"}),
    "ai.onnxruntime.OrtSession$Result": frozenset({"get", "size", "close", "iterator"}),
    "ai.onnxruntime.OnnxTensor": frozenset({"createTensor", "getFloatBuffer", "getValue", "getInfo", "close"}),
    "ai.onnxruntime.OnnxValue": frozenset({"getValue", "getInfo", "getType", "close"}),
    "org.pytorch.executorch.Module": frozenset({"load", "forward", "execute", "loadMethod", "getMethods",
                                                "getMethodMetadata", "destroy", "close", "readLogBuffer"}),
    "org.pytorch.executorch.Tensor": frozenset({"fromBlob", "allocateFloatBuffer", "getDataAsFloatArray", "shape",
                                                "numel", "dtype", "fromBlobUnsigned", "zeros", "ones"}),
    "org.pytorch.executorch.EValue": frozenset({"from", "toTensor", "isTensor", "optionalNone", "toInt",
                                                "toDouble", "toBool", "toStr", "isNone"}),
}

# Helpers the fakes add for the tests' own bookkeeping; never called by the app (checked below).
FAKE_ONLY: dict[str, frozenset[str]] = {"java.util.HashMap": frozenset({"entries"})}
