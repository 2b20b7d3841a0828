"""Registers kiln's OmegaConf resolvers in DVC's Hydra composition (`dvc exp run -S ...`).

DVC composes params.yaml from conf/ itself and loads Hydra plugins from the project root; Hydra
imports every module of this `hydra_plugins` namespace package, so importing this one registers
the resolvers that conf/config.yaml's derived `pipeline:` keys use. `kiln params` registers
the same ones. See kiln.config.resolvers.register_resolvers.
"""

from kiln.config.resolvers import register_resolvers

register_resolvers()
