"""DGC in other people's training loops: Hugging Face Accelerate (:mod:`.accelerate`).

Plain DDP needs nothing from here: ``dtrain.comm.register_dgc(ddp_model, optimizer)``.
"""
