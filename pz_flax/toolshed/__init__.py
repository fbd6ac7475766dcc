"""Penzai's toolshed under its module names: utilities built on pz_flax's layers.

Training and sharding: `basic_training`, `sharding_util`, `lora`. Running and rewriting
models: `jit_wrapper`, `gradient_checkpointing`, `auto_nmap`. Looking inside them:
`save_intermediates`, `isolate_submodel`, `model_rewiring`, `token_visualization`,
`patch_ipdb`. Bringing Flax Linen models in: `unflaxify`. Import each module by name
(``from pz_flax.toolshed import jit_wrapper``); none is imported with the package.
"""
