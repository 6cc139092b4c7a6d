"""The runtimes that run an exported model (``aimonk.artifact``) on the CPU: ONNX Runtime and OpenVINO.

Each session takes a uint8 batch (B, 3, S, S) as a NumPy array and returns the probabilities
(B, n_attributes). Both are optional extras (``pip install -e '.[deploy]'``); torch stays the reference.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np

from aimonk.artifact import DEPLOY_EXTRA, INPUT_NAME, OUTPUT_NAME, Artifact, is_ir

EXPORT_RUNTIMES = ("onnxruntime", "openvino")  # the runtimes of an exported model, most used first


def installed(runtime: str) -> bool:
    """Whether the Python package of ``runtime`` (``onnxruntime`` or ``openvino``) is installed."""
    return importlib.util.find_spec(runtime) is not None and importlib.util.find_spec("onnx") is not None


def installed_runtimes(path: str | os.PathLike | None = None) -> list[str]:
    """The export runtimes installed here that can run ``path`` (any export if None), in ``EXPORT_RUNTIMES``
    order: an OpenVINO IR export runs on openvino only."""
    return [r for r in EXPORT_RUNTIMES if installed(r) and (path is None or not is_ir(path) or r == "openvino")]


class OnnxRuntimeSession:
    """An ONNX Runtime CPU session of an artifact.

    Args:
        artifact: a verified exported model.
        threads: intra-op threads (0: ONNX Runtime's default, one per physical core).
    """

    name = "onnxruntime"

    def __init__(self, artifact: Artifact, threads: int = 0, precision: str = "fp32"):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # errors only
        self.session = ort.InferenceSession(artifact.data, options, providers=["CPUExecutionProvider"])
        self.precision = artifact.precision  # what it computes in: the export's precision

    def run(self, images: np.ndarray) -> np.ndarray:
        """Probabilities (B, n_attributes) of a uint8 batch (B, 3, S, S)."""
        return self.session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(images, np.uint8)})[0]


class OpenVinoSession:
    """An OpenVINO CPU model compiled from an artifact, in f32 by default (no bf16 downcast), so it keeps
    parity with torch; with ``precision="bf16"`` OpenVINO computes in bf16 where the CPU has it (asked for
    explicitly, or taken by runtime auto where the checkpoint's validation images verify it). On a CPU
    without bf16, OpenVINO compiles such a request in f32: ``precision`` is what the compiled model reports.

    Args:
        artifact: a verified exported model.
        threads: inference threads (0: OpenVINO's default).
        precision: ``"fp32"`` or ``"bf16"`` (OpenVINO's inference precision hint).
    """

    name = "openvino"

    def __init__(self, artifact: Artifact, threads: int = 0, precision: str = "fp32"):
        import openvino as ov

        core = ov.Core()
        settings = {"INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32", "PERFORMANCE_HINT": "LATENCY",
                    **({"INFERENCE_NUM_THREADS": threads} if threads else {})}
        model = core.read_model(str(artifact.path)) if is_ir(artifact.path) else core.read_model(artifact.data)
        self.compiled = core.compile_model(model, "CPU", settings)
        bf16 = self.compiled.get_property("INFERENCE_PRECISION_HINT") == ov.Type.bf16  # what OpenVINO compiled
        self.precision = "bf16" if bf16 and artifact.precision == "fp32" else artifact.precision
        self.request = self.compiled.create_infer_request()

    def run(self, images: np.ndarray) -> np.ndarray:
        """Probabilities (B, n_attributes) of a uint8 batch (B, 3, S, S)."""
        self.request.infer({0: np.ascontiguousarray(images, np.uint8)})
        return self.request.get_output_tensor(0).data.copy()


SESSIONS = {"onnxruntime": OnnxRuntimeSession, "openvino": OpenVinoSession}


def open_session(runtime: str, artifact: Artifact, threads: int = 0, precision: str = "fp32"):
    """A session of ``artifact`` on ``runtime``; ``precision`` bf16 (an fp32 export computed in bf16) on openvino only.

    Raises:
        ValueError: for an unknown runtime, or a precision the runtime does not offer.
        ImportError: if the runtime is not installed, saying how to install it.
    """
    if runtime not in SESSIONS:
        raise ValueError(f"runtime must be one of {list(SESSIONS)} for an exported model, got {runtime!r}")
    if not installed(runtime):
        raise ImportError(f"runtime {runtime!r} is not installed: {DEPLOY_EXTRA}")
    if is_ir(artifact.path) and runtime != "openvino":
        raise ValueError(f"{artifact.path}: an OpenVINO IR export runs on openvino, not {runtime}")
    if precision not in ("fp32", artifact.precision) and not (precision == "bf16" and runtime == "openvino"
                                                             and artifact.precision == "fp32"):
        raise ValueError(f"{artifact.path}: {runtime} runs this {artifact.precision} export in {artifact.precision}"
                         f"{' (bf16: openvino, from an fp32 export)' if precision == 'bf16' else ''}, not {precision}")
    return SESSIONS[runtime](artifact, threads, precision)
