"""A GPU-free dress rehearsal of the training step: ``python -m ivfast.train --config X --rehearse``.

The real :class:`Trainer` is built at the config's real sizes on a simulated GPU (fake tensors
on ``cuda:0``: shapes, dtypes and devices, no data, no kernel launch; random teacher and
predictor weights, no weight files read) and runs real ``train_step()`` calls: bf16 autocast,
the copy stream, the decoder's custom ops, fused AdamW. It reports peak memory per GPU and what
holds it, FLOPs per step by module next to ``ivfast.models.flops``, the dtype and fp32 matmul
precision of every GEMM by module, and the attention kernels a GPU would be asked for; it fails
with one line when the step would not fit the GPU.

What it does not see: a compiled graph (it runs eager, whose saved activations bound a compiled
step's from above), allocator fragmentation (covered by the stated margin), CUDA context and
communication buffers, and anything about speed.
"""
