"""SDAR attention inside Megatron's layers.

* :mod:`~megatron_sdar.attention.core`: the ``core_attention`` modules (SDAR mask; causal for the AR
  baseline) that ``ModuleSpec`` puts in Megatron's ``SelfAttention``;
* :mod:`~megatron_sdar.attention.cache`: masks, split plans and RoPE tables derived once per layout;
* :mod:`~megatron_sdar.attention.flex`: FlexAttention (CUDA): compiled kernel, block mask, tile options;
* :mod:`~megatron_sdar.attention.split`: variable-length flash attention plus a band, merged exactly.
"""
