"""A fake of pyobjus + Core ML: the ObjC class and selector names the app uses, backed by a real model.

A fake ".mlpackage" is a folder holding `backing.json` that names an ONNX file; "compiling" it gives
a ".mlmodelc" URL, and predictions run that ONNX model on the image's pixels / 255 (what a Core ML
image input with scale 1/255 does), then softmax into a class -> probability dictionary, as a Core ML
classifier's `classLabel_probs` output. Checks mirror Core ML: modelWithContentsOfURL: needs a
compiled model, the image size must match pixelsWide/High, outputs are looked up by name.
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
from PIL import Image

K_CV_PIXEL_FORMAT_32BGRA = 0x42475241


class NSString(str):
    pass


class NSNumber:
    def __init__(self, v: float):
        self._v = float(v)

    def doubleValue(self) -> float:  # noqa: N802
        return self._v


class NSDictionary:
    def __init__(self, d: dict):
        self._d = dict(d)

    def objectForKey_(self, key: Any) -> Any:  # noqa: N802
        if not isinstance(key, NSString):
            raise TypeError("objectForKey_: pass an NSString (objc_str)")
        return self._d.get(str(key))


def make_fake_mlpackage(folder: Path, onnx_file: Path, classes: list[str]) -> Path:
    """A folder that stands in for a .mlpackage (its sha256 is that of a directory, as for the real one)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "Manifest.json").write_text(json.dumps({"fileFormatVersion": "1.0.0"}))
    data = folder / "Data" / "com.apple.CoreML"
    data.mkdir(parents=True, exist_ok=True)
    (data / "backing.json").write_text(json.dumps({"onnx": str(onnx_file), "classes": classes}))
    return folder


class FakeObjC:
    def __init__(self) -> None:
        self.calls: list[str] = []
        self.frameworks: list[str] = []
        objc = self

        class NSURL:
            def __init__(self, path: str):
                self._path = path

            @staticmethod
            def fileURLWithPath_(path: Any) -> NSURL:  # noqa: N802
                objc.calls.append("NSURL.fileURLWithPath_")
                if not isinstance(path, NSString):
                    raise TypeError("fileURLWithPath_: pass an NSString (objc_str)")
                return NSURL(str(path))

            def path(self) -> NSString:
                return NSString(self._path)

        class MLFeatureValue:
            def __init__(self, image: np.ndarray | None = None, dictionary: NSDictionary | None = None):
                self._image, self._dictionary = image, dictionary

            @staticmethod
            def featureValueWithImageAtURL_pixelsWide_pixelsHigh_pixelFormatType_options_error_(  # noqa: N802
                    url: NSURL, wide: int, high: int, fmt: int, options: Any, error: Any) -> MLFeatureValue | None:
                objc.calls.append("MLFeatureValue.featureValueWithImageAtURL_pixelsWide_pixelsHigh_"
                                  "pixelFormatType_options_error_")
                if not isinstance(url, NSURL) or fmt != K_CV_PIXEL_FORMAT_32BGRA:
                    raise TypeError("featureValueWithImageAtURL: NSURL and kCVPixelFormatType_32BGRA expected")
                with Image.open(url.path()) as im:
                    if im.size != (wide, high):
                        return None  # Core ML would rescale; the app must already hand over S x S
                    rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)  # [H, W, 3]
                return MLFeatureValue(image=rgb)

            def dictionaryValue(self) -> NSDictionary:  # noqa: N802
                objc.calls.append("MLFeatureValue.dictionaryValue")
                assert self._dictionary is not None
                return self._dictionary

        class MLDictionaryFeatureProvider:
            def __init__(self) -> None:
                self._features: dict | None = None

            @staticmethod
            def alloc() -> MLDictionaryFeatureProvider:
                objc.calls.append("MLDictionaryFeatureProvider.alloc")
                return MLDictionaryFeatureProvider()

            def initWithDictionary_error_(self, d: Any, error: Any) -> MLDictionaryFeatureProvider:  # noqa: N802
                objc.calls.append("MLDictionaryFeatureProvider.initWithDictionary_error_")
                if not isinstance(d, NSDictionary):
                    raise TypeError("initWithDictionary_error_: pass an NSDictionary (objc_dict)")
                self._features = d._d
                return self

            def featureValueForName_(self, name: Any) -> Any:  # noqa: N802
                objc.calls.append("featureValueForName_")
                if not isinstance(name, NSString):
                    raise TypeError("featureValueForName_: pass an NSString")
                return (self._features or {}).get(str(name))

        class MLModel:
            def __init__(self, backing: dict):
                import onnxruntime as ort

                self._sess = ort.InferenceSession(backing["onnx"], providers=["CPUExecutionProvider"])
                self._classes = backing["classes"]

            @staticmethod
            def compileModelAtURL_error_(url: NSURL, error: Any) -> NSURL | None:  # noqa: N802
                objc.calls.append("MLModel.compileModelAtURL_error_")
                src = Path(url.path())
                if not (src / "Data" / "com.apple.CoreML" / "backing.json").exists():
                    return None
                return NSURL(str(src.with_suffix(".mlmodelc")))

            @staticmethod
            def modelWithContentsOfURL_error_(url: NSURL, error: Any) -> MLModel | None:  # noqa: N802
                objc.calls.append("MLModel.modelWithContentsOfURL_error_")
                path = Path(url.path())
                if path.suffix != ".mlmodelc":
                    return None  # Core ML loads compiled models only
                backing = path.with_suffix(".mlpackage") / "Data" / "com.apple.CoreML" / "backing.json"
                return MLModel(json.loads(backing.read_text()))

            def predictionFromFeatures_error_(self, provider: Any, error: Any) -> Any:  # noqa: N802
                objc.calls.append("MLModel.predictionFromFeatures_error_")
                if not isinstance(provider, MLDictionaryFeatureProvider):
                    raise TypeError("predictionFromFeatures_error_: an MLFeatureProvider is expected")
                value = (provider._features or {}).get("image")
                if value is None or value._image is None:
                    return None  # missing input 'image'
                x = (value._image.astype(np.float32) / np.float32(255.0)).transpose(2, 0, 1)[None]  # scale 1/255
                (out_row,) = self._sess.run(None, {self._sess.get_inputs()[0].name: np.ascontiguousarray(x)})
                # the ONNX stand-in may carry the feature distance column after the logits; Core ML files do not
                logits = out_row[:, :len(self._classes)]
                z = np.exp(logits[0] - logits[0].max())
                probs = z / z.sum()
                out = MLDictionaryFeatureProvider()
                out._features = {
                    "classLabel_probs": MLFeatureValue(dictionary=NSDictionary(
                        {c: NSNumber(p) for c, p in zip(self._classes, probs)})),
                    "classLabel": self._classes[int(np.argmax(probs))],
                }
                return out

        self.classes = {"NSURL": NSURL, "MLModel": MLModel, "MLFeatureValue": MLFeatureValue,
                        "MLDictionaryFeatureProvider": MLDictionaryFeatureProvider}

    def autoclass(self, name: str) -> Any:
        self.calls.append(f"autoclass {name}")
        if name not in self.classes:
            raise KeyError(f"ObjC class {name} not found (framework not loaded?)")
        if name.startswith("ML") and "/System/Library/Frameworks/CoreML.framework" not in self.frameworks:
            raise KeyError(f"ObjC class {name} not found: CoreML.framework not loaded")
        return self.classes[name]

    def load_framework(self, path: str) -> None:
        self.calls.append(f"load_framework {path}")
        self.frameworks.append(path)

    @staticmethod
    def objc_str(s: str) -> NSString:
        return NSString(s)

    @staticmethod
    def objc_dict(d: dict) -> NSDictionary:
        return NSDictionary({str(k): v for k, v in d.items()})

    def bridge(self) -> SimpleNamespace:
        return SimpleNamespace(autoclass=self.autoclass, objc_str=self.objc_str, objc_dict=self.objc_dict,
                               load_framework=self.load_framework)
