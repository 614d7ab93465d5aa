"""Facts about ONNX ops that several passes rely on (default domain)."""

from __future__ import annotations

# Ops whose results are random: never folded, never merged as duplicates.
NONDETERMINISTIC = frozenset({
    "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli",
})

# Ops whose output shape is the numpy broadcast of their inputs' shapes.
ELEMENTWISE = frozenset({
    "Abs", "Acos", "Acosh", "Add", "And", "Asin", "Asinh", "Atan", "Atanh", "BitShift", "BitwiseAnd",
    "BitwiseNot", "BitwiseOr", "BitwiseXor", "Cast", "Ceil", "Celu", "Clip", "Cos", "Cosh", "Div", "Elu",
    "Equal", "Erf", "Exp", "Floor", "Gelu", "Greater", "GreaterOrEqual", "HardSigmoid", "HardSwish",
    "Identity", "IsInf", "IsNaN", "LeakyRelu", "Less", "LessOrEqual", "Log", "Max", "Mean", "Min", "Mish",
    "Mod", "Mul", "Neg", "Not", "Or", "Pow", "PRelu", "Reciprocal", "Relu", "Round", "Selu", "Sigmoid",
    "Sign", "Sin", "Sinh", "Softplus", "Softsign", "Sqrt", "Sub", "Sum", "Tan", "Tanh", "ThresholdedRelu",
    "Where", "Xor",
})

# Elementwise ops whose result is boolean.
BOOL_RESULT = frozenset({"Equal", "Greater", "GreaterOrEqual", "Less", "LessOrEqual", "IsInf", "IsNaN",
                         "And", "Or", "Xor", "Not"})

# Inputs that carry data, by op; the others are shapes, indices, scales, bounds: parameters
# that quantization leaves alone and that an integer-only target takes as they are. An op
# not listed carries data in every input.
DATA_INPUTS = {
    "Conv": (0,), "ConvTranspose": (0,), "Gemm": (0,), "MatMul": (0, 1), "Resize": (0,),
    "Upsample": (0,), "Reshape": (0,), "Slice": (0,), "Pad": (0,), "Squeeze": (0,), "Unsqueeze": (0,),
    "Expand": (0,), "Tile": (0,), "Gather": (0,), "GatherElements": (0,), "GatherND": (0,),
    "Split": (0,), "Clip": (0,), "BatchNormalization": (0,), "InstanceNormalization": (0,),
    "LayerNormalization": (0,), "PRelu": (0,), "TopK": (0,), "ReduceMean": (0,), "ReduceSum": (0,),
    "ReduceMax": (0,), "ReduceMin": (0,), "Where": (1, 2), "MaxPool": (0,), "AveragePool": (0,),
    "GlobalAveragePool": (0,), "GlobalMaxPool": (0,), "Transpose": (0,), "Flatten": (0,),
    "DepthToSpace": (0,), "SpaceToDepth": (0,), "LpNormalization": (0,), "CumSum": (0,),
}


def data_input_indices(op: str, count: int) -> tuple[int, ...]:
    """Indices of the data inputs of an ``op`` node with ``count`` inputs."""
    return DATA_INPUTS.get(op, tuple(range(count)))
