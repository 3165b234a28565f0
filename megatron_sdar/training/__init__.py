"""What ``pretrain_sdar.py`` hands to ``megatron.training.pretrain``.

* :mod:`~megatron_sdar.training.arguments`: the ``--sdar-*`` flags and the checks that stop a run
  before it builds a model (settings, the checkpoint it starts from, logging), all listed at once;
* :mod:`~megatron_sdar.training.datasets`: CPT and SFT datasets yielding noised SDAR samples;
* :mod:`~megatron_sdar.training.model_provider`: the SDAR model or the AR baseline per stage;
* :mod:`~megatron_sdar.training.step`: the forward step (batch copy, agreement check, losses);
* :mod:`~megatron_sdar.training.throughput` and :mod:`~megatron_sdar.training.flops`: what is logged
  and benchmarked.
"""
