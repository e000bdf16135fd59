"""Communication hooks for DDP: Deep Gradient Compression and the baselines it is measured against.

Two lines add DGC to existing DDP code::

    from dtrain.comm import register_dgc
    dgc = register_dgc(ddp_model, optimizer, density=0.001)

Each bucket's selected entries travel as a sparse all-gather or, where that sends more bytes
(past about 1/density ranks), as a dense reduction: :mod:`dtrain.comm.costmodel` decides.
"""

from dtrain.comm.baselines import HOOKS, make_hook, powersgd_waiting_hook
from dtrain.comm.dgc import DGCState, dgc_hook
from dtrain.comm.register import register_dgc, unwrap_ddp

__all__ = [
    "HOOKS",
    "DGCState",
    "dgc_hook",
    "make_hook",
    "powersgd_waiting_hook",
    "register_dgc",
    "unwrap_ddp",
]
