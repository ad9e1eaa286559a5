"""The training engine: runtime (device, precision), optimizers, pure schedules, BN policies, the
step loop and `train(config) -> RunResult` with resume."""
