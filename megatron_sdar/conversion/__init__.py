"""Checkpoint conversion between HF models and Megatron ``torch_dist`` checkpoints.

* :mod:`~megatron_sdar.conversion.architecture`: the shape both sides agree on, as Megatron flags;
* :mod:`~megatron_sdar.conversion.hf`: reading HF configs and safetensors lazily;
* :mod:`~megatron_sdar.conversion.mapping`: parameter mapping (fused QKV, SwiGLU, experts);
* :mod:`~megatron_sdar.conversion.megatron`: checkpoint folders and the recorded architecture;
* :mod:`~megatron_sdar.conversion.torch_dist`: writing and reading ``torch_dist`` chunk by chunk.
"""
