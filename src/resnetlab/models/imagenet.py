"""ImageNet ResNets and plain nets (paper Table 1): 7x7/2 stem and 3x3/2 max-pool, four stages
with 64/128/256/512 planes on 56/28/14/7 maps, option-B shortcuts by default."""
from __future__ import annotations

from resnetlab.models.factory import ArchSpec, register

# depth: (block kind, blocks per stage), paper Table 1.
IMAGENET_ARCHS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}

for _depth, (_block, _stages) in IMAGENET_ARCHS.items():
    register(f"resnet{_depth}", ArchSpec("imagenet", _depth, _block, _stages))
# The plain baselines of Table 2 / Fig. 4.
for _depth in (18, 34):
    register(f"plain{_depth}", ArchSpec("imagenet", _depth, *IMAGENET_ARCHS[_depth], plain=True))
