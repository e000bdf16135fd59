"""The compression jobs' glue between a method package and the shared trainer: their config
sections, the model they start from and the :class:`~dtrain.trainer.Extension` that applies the
method during training. The entry points (``dtrain/prune.py``, ...) only name them."""
