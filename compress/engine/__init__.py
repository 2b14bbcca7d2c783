"""The training engine (``--engine dense|sparse|auto``): how masked layers form their weight gradients and keep
their optimizer state.

``dense`` computes every weight gradient and masks it (``compress.training.MaskConstraint``): a run at 1% costs a
dense run. ``sparse`` trains each masked Linear/ConvNd weight as a vector over its trained entries: the weight
gradient is formed at those entries only (``kernels``), the optimizer state (momentum, Adam moments) is a vector
of the same length, and in prune mode a Linear layer may run its products on a CSR weight. ``auto`` (the default)
is the sparse engine with the sparse kernels only where ``choice`` says they pay. Results of the engines agree to
floating-point tolerance, not bit for bit (the products are summed in another order); masks and frozen values stay
exact under every engine, and a resume is bit-exact within one engine.
"""
from compress.engine.choice import ENGINES, choose_kernels, engine_layer
from compress.engine.kernels import LayerKernels, SparseLayer
from compress.engine.session import INDEX_PREFIX, SparseEngine

__all__ = ["ENGINES", "INDEX_PREFIX", "LayerKernels", "SparseEngine", "SparseLayer", "choose_kernels", "engine_layer"]
