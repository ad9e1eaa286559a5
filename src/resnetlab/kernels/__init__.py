"""Hand-written CPU kernels for what the native operators do slowly, each with its native fallback.

`bn_relu`: training-mode batch norm + (residual addition +) ReLU in one pass, bf16 channels_last on
the CPU. The models call `bn_relu(...)` everywhere a BN is followed by a ReLU; the fused kernel runs
only inside `fused_bn_relu()` (which `Runtime.autocast()` enters when `runtime.fused_bn` is on), so
models used on their own behave exactly as torchvision's.
"""
from resnetlab.kernels.batch_norm_relu import bn_relu, fused_bn_relu, fused_kernel_applies
from resnetlab.kernels.build import load_bn_relu_extension

__all__ = ["bn_relu", "fused_bn_relu", "fused_kernel_applies", "load_bn_relu_extension"]
