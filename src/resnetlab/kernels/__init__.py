"""Hand-written CPU kernels for what the native operators do slowly, each with its native fallback.

`bn_relu`: training-mode batch norm + (residual addition +) ReLU in one pass, bf16 channels_last on
the CPU. The models call `bn_relu(...)` everywhere a BN is followed by a ReLU; the fused kernel runs
only inside `fused_bn_relu()` (which `Runtime.autocast()` enters when `runtime.fused_bn` is on), so
models used on their own behave exactly as torchvision's.

`conv3x3_train`: a 3x3 convolution computed by CPU kernels in the same context (bf16 channels_last):
forward pass and input gradient direct or, at stride 1 inside `conv_winograd(True)`, by Winograd
F(2x2, 3x3); the weight gradient in fp32 (inside `conv_weight_grad(...)`), at stride 1 from 32 channels
by Winograd as well.
"""
from resnetlab.kernels.batch_norm_relu import bn_relu, fused_bn_relu, fused_kernel_applies
from resnetlab.kernels.build import (load_bn_relu_extension, load_conv_fwd_extension, load_conv_wgrad_extension,
                                     load_conv_winograd_extension)
from resnetlab.kernels.conv3x3 import conv3x3_train, conv_weight_grad, conv_winograd

__all__ = ["bn_relu", "conv3x3_train", "conv_weight_grad", "conv_winograd", "fused_bn_relu", "fused_kernel_applies",
           "load_bn_relu_extension", "load_conv_fwd_extension", "load_conv_wgrad_extension", "load_conv_winograd_extension"]
