"""The models the harness knows: where they are, the inputs they are measured on, and the
task metric of each where one can be computed here (../shared/models/README.md).

Inputs are fixed per model so that every tool's output is measured on the same tensors:
the digits CNN on its test split (examples/digits_test.npz), MiniLM on tokenized sentences,
the others on seeded random inputs of a realistic size (PP-OCR images in [-1, 1] as the
rapidocr preprocessing gives them; Silero on low-level noise with a zero state). PP-OCR's
character accuracy and Silero's decision agreement on speech need rendered text and
synthesized speech (rapidocr, espeak-ng), not set up here: those models are judged on
their raw outputs (SNR, cosine) only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

REPO = Path(__file__).resolve().parents[2]
MODELS = REPO / ".models"
EXAMPLES = REPO / "examples"


@dataclass
class BenchModel:
    name: str
    path: Path
    make_inputs: Callable[[], dict[str, np.ndarray]]
    # task(outputs of the model on make_inputs()) -> score; compared between variants
    task: Callable[[dict], float] | None = None
    task_name: str | None = None
    # task scores computed against the original's outputs (embedding cosine, decision agreement)
    relative_task: Callable[[dict, dict], float] | None = None
    calibration: Path | None = None  # data for pipelines that calibrate (never the eval inputs)


def _uniform(shape, seed: int, low=-1.0, high=1.0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(low, high, shape).astype(np.float32)


# -- digits CNN: accuracy on the test split --------------------------------------------------------
def _digits_inputs() -> dict[str, np.ndarray]:
    with np.load(EXAMPLES / "digits_test.npz") as d:
        return {"image": d["image"]}


def _digits_accuracy(outputs: dict) -> float:
    with np.load(EXAMPLES / "digits_test.npz") as d:
        labels = d["label"]
    return float(np.mean(np.argmax(outputs["logits"], -1) == labels))


# -- MiniLM: mean-pooled sentence embeddings ------------------------------------------------------
SENTENCES = [
    "The cat sat quietly on the warm windowsill.",
    "Quarterly revenue rose 12% while costs stayed flat.",
    "How do I reset my password if I lost my phone?",
    "Photosynthesis turns light, water and carbon dioxide into sugar.",
    "The train to Lyon leaves at 7:45 from platform 3.",
    "She plays the cello in a string quartet on Sundays.",
    "Compilers translate source code into machine instructions.",
    "Add two cups of flour and stir until smooth.",
    "The referee stopped the match after a heavy downpour.",
    "Glaciers in the Alps have lost a third of their volume.",
    "Please send the signed contract by Friday.",
    "A neural network learns weights from examples.",
    "The museum reopens next spring after renovation.",
    "My laptop battery drains fast when the screen is bright.",
    "Volcanic soil is rich in minerals and good for vines.",
    "Interest rates were left unchanged this month.",
    "The child laughed at the puppy chasing its tail.",
    "Tighten the bolts in a star pattern to avoid warping.",
    "An eclipse happens when the moon blocks the sun.",
    "We need three volunteers for the weekend shift.",
    "Bananas are berries, but strawberries are not.",
    "The software update fixed the login bug.",
    "Ancient Rome had aqueducts that carried water for miles.",
    "Is there a pharmacy open near the station tonight?",
]
SEQ = 32


def _minilm_inputs(sentences: list[str] = SENTENCES) -> dict[str, np.ndarray]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(MODELS / "minilm_l6_tokenizer" / "tokenizer.json"))
    tok.enable_truncation(SEQ)
    tok.enable_padding(length=SEQ)
    enc = tok.encode_batch(sentences)
    ids = np.array([e.ids for e in enc], np.int64)
    mask = np.array([e.attention_mask for e in enc], np.int64)
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


def _embeddings(outputs: dict, mask: np.ndarray) -> np.ndarray:
    hidden = outputs["last_hidden_state"].astype(np.float64)
    m = mask[..., None].astype(np.float64)
    pooled = (hidden * m).sum(1) / np.maximum(m.sum(1), 1e-9)
    return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)


def _minilm_cosine(reference: dict, candidate: dict) -> float:
    """Mean cosine of the candidate's sentence embeddings to the original's."""
    mask = _minilm_inputs()["attention_mask"]
    a, b = _embeddings(reference, mask), _embeddings(candidate, mask)
    return float(np.mean(np.sum(a * b, axis=1)))


def known_models() -> dict[str, BenchModel]:
    return {m.name: m for m in [
        BenchModel("digits_cnn", EXAMPLES / "digits_cnn.onnx", _digits_inputs, _digits_accuracy, "accuracy",
                   calibration=EXAMPLES / "digits_calib.npz"),
        BenchModel("ppocr_mobile_v2_cls", MODELS / "ppocr_mobile_v2_cls.onnx",
                   lambda: {"x": _uniform((1, 3, 48, 192), 1)}),
        BenchModel("ppocr_v4_det", MODELS / "ppocr_v4_det.onnx", lambda: {"x": _uniform((1, 3, 320, 320), 2)}),
        BenchModel("ppocr_v4_rec", MODELS / "ppocr_v4_rec.onnx", lambda: {"x": _uniform((1, 3, 48, 320), 3)}),
        BenchModel("silero_vad_16k_op15", MODELS / "silero_vad_16k_op15.onnx",
                   lambda: {"input": _uniform((1, 512), 4, -0.05, 0.05), "state": np.zeros((2, 1, 128), np.float32),
                            "sr": np.array(16000, np.int64)}),
        BenchModel("silero_vad_16k_sequence", MODELS / "silero_vad_16k_sequence.onnx",
                   lambda: {"input": _uniform((16, 576), 5, -0.05, 0.05), "h": np.zeros((1, 1, 128), np.float32),
                            "c": np.zeros((1, 1, 128), np.float32)}),
        BenchModel("minilm_l6", MODELS / "minilm_l6.onnx", _minilm_inputs,
                   task_name="embedding cosine", relative_task=_minilm_cosine),
    ]}
