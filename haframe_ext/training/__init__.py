"""The trainer's parts: the configuration and builders, models and baselines' heads, datasets, the loop, the step's
numerics, resuming, the run folder and its log, evaluation and process groups. The entry points are in
:mod:`haframe_ext.train`."""
