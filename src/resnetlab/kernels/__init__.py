"""Hand-written CPU kernels for what the native operators do slowly, each with its native fallback.

`bn_relu`: training-mode batch norm + (residual addition +) ReLU in one pass, bf16 channels_last on
the CPU. The models call `bn_relu(...)` everywhere a BN is followed by a ReLU; the fused kernel runs
only inside `fused_bn_relu()` (which `Runtime.autocast()` enters when `runtime.fused_bn` is on), so
models used on their own behave exactly as torchvision's.

`conv3x3_train`: a 3x3 convolution computed by CPU kernels (bf16 channels_last; forward, input and
weight gradients), in the same context; `conv3x3_before_bn` also hands the `bn_relu` that follows its
statistics, gathered as the output is written, and adds a block's shortcut gradient in its kernel;
`bn_relu_conv3x3` runs BN + ReLU + conv as one step whose backward kernels share the BN's first pass.
"""
from resnetlab.kernels.batch_norm_relu import bn_relu, fused_bn_relu, fused_kernel_applies
from resnetlab.kernels.build import load_bn_relu_extension, load_conv_fwd_extension, load_conv_wgrad_extension
from resnetlab.kernels.bn_relu_conv import ConvOutput, bn_relu_conv3x3
from resnetlab.kernels.conv3x3 import ConvBeforeBatchNorm, conv3x3_before_bn, conv3x3_train, conv_weight_grad

__all__ = ["ConvBeforeBatchNorm", "ConvOutput", "bn_relu", "bn_relu_conv3x3", "conv3x3_before_bn", "conv3x3_train", "conv_weight_grad", "fused_bn_relu", "fused_kernel_applies", "load_bn_relu_extension",
           "load_conv_fwd_extension", "load_conv_wgrad_extension"]
