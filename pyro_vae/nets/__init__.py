"""Networks that models and guides are built from: MLPs and stride-2 convolutional stacks."""
from .mlp import ACTIVATIONS, mlp, split_loc_scale

__all__ = ["ACTIVATIONS", "mlp", "split_loc_scale"]
