"""Hyperparameter search over RunConfig keys: the genetic algorithm of seed 004 and Optuna's TPE and
random samplers, all recorded in Optuna studies so that every method is reported alike."""
