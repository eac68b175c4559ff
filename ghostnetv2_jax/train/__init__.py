"""The training system: ``trainer.train_and_evaluate(config, workdir)`` and its parts.

  state.py       TrainState (params, BN statistics, optimizer state, EMA, step, RNG), the model
                 and the abstract state a config trains
  optim.py       optimizer and lr schedule from a config (optax)
  sharding.py    multi-host start-up, the device mesh, batch sharding
  checkpoint.py  orbax checkpoints, preemption, workdir identity
  metrics.py     TensorBoard / JSON-lines writers, progress with img/s and ETA
  trainer.py     the loop
"""
