"""The validation pass at the end of each epoch: loss and top-1/top-5 error of the evaluated model
(the EMA of the weights when it is on), over the whole validation split -- with several processes,
each rank on its own slice and the sums added up."""
from __future__ import annotations

import dataclasses

import torch

from resnetlab.config import RunConfig
from resnetlab.engine.data import TrainData, evaluate_val
from resnetlab.engine.distributed import DistInfo, all_reduce_sum_, broadcast_module_
from resnetlab.engine.loop import Trainer


def validate(data: TrainData, trainer: Trainer, config: RunConfig, dist: DistInfo) -> dict:
    """{"val_loss", "val_top1_error", "val_top5_error"}, or {} without a validation split."""
    if dist.enabled:
        return _validate_sharded(data, trainer, config, dist)
    runtime = trainer.runtime
    result = evaluate_val(data, trainer.eval_model, config, runtime.device, runtime.precision)
    if result is None:
        return {}
    return {"val_loss": result.loss, "val_top1_error": result.top1_error, "val_top5_error": result.top5_error}


def _validate_sharded(data: TrainData, trainer: Trainer, config: RunConfig, dist: DistInfo) -> dict:
    """Every rank evaluates rank 0's weights on its own slice of the validation set (sizes differ by
    at most one image; none is left out or counted twice), and the sums are added up over the ranks."""
    val, model, runtime = data.splits.val, trainer.eval_model, trainer.runtime
    if val is None:
        return {}
    broadcast_module_(model, dist)  # without SyncBN the BN statistics differ per rank
    part = torch.tensor_split(torch.arange(len(val)), dist.world_size)[dist.rank]
    sums = torch.zeros(4, dtype=torch.float64)  # loss, top-1 and top-5 errors times images; images
    if len(part):
        shard = dataclasses.replace(data, splits=dataclasses.replace(data.splits, val=val.subset(part)))
        result = evaluate_val(shard, model, config, runtime.device, runtime.precision)
        numbers = [result.loss, result.top1_error, result.top5_error, 1.0]
        sums = torch.tensor(numbers, dtype=torch.float64) * len(part)
    all_reduce_sum_(sums)
    loss, top1, top5 = (sums[:3] / sums[3]).tolist()
    return {"val_loss": loss, "val_top1_error": top1, "val_top5_error": top5}
